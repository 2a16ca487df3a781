"""`fmbseg balance`: the training index from Stage 1's pseudo labels (the DVC stage `balance`).

Every Stage 1.1 map plus a seeded ``balance.ratio`` of the images' Stage 1.2 maps, each a sample
(appendix §2.1, Table 2); ``dvc exp run -S balance.ratio=0.33`` is one ablation row. An image with
a correction in ``${paths.corrections}`` (`fmbseg import-labels`) trains on that map alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flows.common import PARAMS_FILE, output_root, project_path, stage_params, table_artifact
from flows.deferred import flow

__all__ = ["balance_flow", "register"]

@flow(name="balance", flow_run_name="balance", log_prints=True)
def balance_flow(params_path: str = PARAMS_FILE) -> dict[str, Any]:
    """Write ``${paths.train_index}``; returns counts per variant."""
    import pyarrow as pa

    from components.labelling.balance import CORRECTED, balance_index
    from components.labelling.corrections import Corrections
    from components.labelling.store import PseudoLabels, write_table

    params = stage_params(params_path)
    root = output_root(params)
    labels = PseudoLabels(root)
    records = labels.index.loc[:, ["image_id", "image_path", "shard", "row"]].copy()
    records["shard"] = [(root / shard).as_posix() for shard in records["shard"]]
    shares = params.balance.shares()
    missing = [v for v, share in shares.items() if share > 0 and not labels.has_variant(v)]
    if missing:
        raise ValueError(f"balance.variants gives a share to {', '.join(missing)}, but {root} holds no such maps: "
                         "label with models.teacher set (e.g. sam3), or drop it from balance.variants")
    corrected = Corrections(project_path(params, "corrections")).current(labels)
    index = balance_index(records, params.balance.ratio, params.balance.seed, shares, corrected)
    path = project_path(params, "train_index")
    write_table(path, pa.Table.from_pandas(index, preserve_index=False))
    counts = {CORRECTED: 0, **{variant: int(n) for variant, n in index["variant"].value_counts().sort_index().items()}}
    summary = {"images": len(records), "samples": len(index), **counts,
               "ratio": params.balance.ratio, "seed": params.balance.seed,
               **{f"share {v}": share for v, share in params.balance.variants.items()}}
    print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    table_artifact([{"quantity": k, "value": v} for k, v in summary.items()], key="balance-summary",
                   description="training index: samples per pseudo label variant")
    return summary


def register(app: typer.Typer) -> None:
    @app.command("balance")
    def balance_cmd(params: Path = typer.Option(Path(PARAMS_FILE), help="settings file")) -> None:
        """Training index: every Stage 1.1 map + a seeded balance.ratio of the Stage 1.2 maps."""
        balance_flow(str(params))
