"""`fmbseg weights status|fetch|train-demo`: every weight file a profile needs, present or missing;
fetching the published ones; retraining the demo world's stand-ins."""

from __future__ import annotations

from pathlib import Path

import typer

from components.config import load_params

__all__ = ["register", "profile_specs"]


def profile_specs(params_path: Path, profile: str | None) -> tuple[str, list[str], str | None]:
    """(profile name, its clip/sam/dino spec names and its concept teacher's, if it has one,
    weights_dir) from params.yaml, with the profile's overlay (configs/<profile>.yaml) on top."""
    from components.config import parse_params
    from flows.common import profile_settings

    params = load_params(params_path)
    name = profile or params.models.profile
    if name not in params.models.profiles:
        raise typer.BadParameter(f"unknown profile {name!r}; params.yaml defines {sorted(params.models.profiles)}")
    if profile is not None:  # the overlay may set more than the profile's three models (modern: the teacher)
        params = parse_params(profile_settings(profile, params_path), f"{params_path} with --profile {profile}")
    chosen = params.models.profiles[name]
    teacher = [params.models.teacher] if params.models.teacher else []
    return name, [chosen.clip, chosen.sam, chosen.dino, *teacher], params.models.weights_dir


def _specs(names: list[str]) -> list:
    """The registry specs of ``names`` (an unknown name is a usage error that lists the known ones)."""
    from components.models.registry import get_spec

    try:
        return [get_spec(n) for n in names]
    except KeyError as err:
        raise typer.BadParameter(str(err.args[0] if err.args else err)) from None


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def register(app: typer.Typer) -> None:
    weights = typer.Typer(help="Model weights: what a profile needs, and fetching it.", no_args_is_help=True)
    app.add_typer(weights, name="weights")

    profile_opt = typer.Option(None, "--profile", show_default="models.profile", help="models profile")
    params_opt = typer.Option(Path("params.yaml"), "--params", help="settings file")
    names_arg = typer.Argument(None, show_default="the profile's", help="registry spec names")

    @weights.command("status")
    def status_cmd(names: list[str] = names_arg, profile: str = profile_opt, params: Path = params_opt) -> None:
        """List every weight file the profile (or the named specs) needs, present or missing, with sizes."""
        from components.models.registry import get_spec
        from components.models.weights import gated_help, weights_status

        label, specs, weights_dir = profile_specs(params, profile)
        specs = list(names) if names else specs
        rows = weights_status(_specs(specs), weights_dir=weights_dir)
        typer.echo(f"profile {label}: {', '.join(specs)}")
        if not rows:
            typer.echo("  no weight files needed (these miniatures are built with seeded random weights)")
        for row in rows:
            mark = "present" if row.present else "MISSING"
            typer.echo(f"  {mark:8} {row.spec:22} {row.file:36} {_human(row.size):>9}  {row.path}")
        missing = [r for r in rows if not r.present]
        for name in dict.fromkeys(r.spec for r in missing if get_spec(r.spec).gated):
            typer.echo(f"  {name}: {gated_help(get_spec(name).weights[0])}")
        if missing:
            trained = {r.spec for r in missing if get_spec(r.spec).miniature}  # stand-ins: trained, not fetched
            hints = ([f"fmbseg weights fetch --profile {label}"] if len(trained) < len(missing) else []) + (
                ["fmbseg weights train-demo"] if trained else [])
            typer.echo(f"{len(missing)} file(s) missing: {' and '.join(hints)}")
            raise typer.Exit(1)

    @weights.command("fetch")
    def fetch_cmd(names: list[str] = names_arg, profile: str = profile_opt, params: Path = params_opt) -> None:
        """Download the weight files the profile (or the named specs) needs and that are not on disk."""
        from flows.preflight import check_online

        check_online()  # offline: one line now, not five retries per file after the model libraries load
        from components.models.weights import GatedWeightsError, fetch_weights  # torch (5 s): after the check

        label, specs, weights_dir = profile_specs(params, profile)
        specs = list(names) if names else specs
        try:
            rows = fetch_weights(_specs(specs), weights_dir=weights_dir, progress=True)
        except GatedWeightsError as err:
            typer.echo(f"fmbseg: {err}", err=True)
            raise typer.Exit(1) from None
        for row in rows:
            typer.echo(f"  {'present' if row.present else 'MISSING':8} {row.spec:22} {row.file:36} {row.path}")

    @weights.command("train-demo")
    def train_demo_cmd(
        out: Path = typer.Option(None, "--out", show_default="<weights dir>/world",
                                 help="folder for the files (wins over the copies bundled with the project)"),
        only: list[str] = typer.Option(None, "--only", show_default="both", help="clip | sam"),
        seed: int = typer.Option(0, help="training seed (the bundled files: 0)"),
        params: Path = params_opt,
    ) -> None:
        """Retrain the demo world's stand-in models (world-clip, world-sam) from their seeded inits,
        on the CPU (a few minutes); they reproduce the files bundled in components/models/standins/weights."""
        from components.models.weights import default_weights_dir
        from demoworld.standins import TRAINED_FAMILIES, train_standin

        families = list(only) if only else list(TRAINED_FAMILIES)
        unknown = [f for f in families if f not in TRAINED_FAMILIES]
        if unknown:
            raise typer.BadParameter(f"--only {unknown[0]!r}: trained stand-ins are {', '.join(TRAINED_FAMILIES)}")
        folder = out if out is not None else default_weights_dir(load_params(params).models.weights_dir) / "world"
        for family in families:
            typer.echo(f"training world-{family} (seed {seed}) ...")
            path, metrics = train_standin(family, folder, seed=seed)
            shown = ", ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            typer.echo(f"  {path} ({_human(path.stat().st_size)}): {shown}")
