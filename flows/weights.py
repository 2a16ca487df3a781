"""`fmbseg weights status|fetch`: every weight file a profile needs, present or missing."""

from __future__ import annotations

from pathlib import Path

import typer

from components.config import load_params

__all__ = ["register", "profile_specs"]


def profile_specs(params_path: Path, profile: str | None) -> tuple[str, list[str], str | None]:
    """(profile name, its clip/sam/dino spec names, weights_dir) from params.yaml."""
    params = load_params(params_path)
    name = profile or params.models.profile
    if name not in params.models.profiles:
        raise typer.BadParameter(f"unknown profile {name!r}; params.yaml defines {sorted(params.models.profiles)}")
    chosen = params.models.profiles[name]
    return name, [chosen.clip, chosen.sam, chosen.dino], params.models.weights_dir


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

    profile_opt = typer.Option(None, "--profile", help="models profile (default: models.profile)")
    params_opt = typer.Option(Path("params.yaml"), "--params", help="settings file")
    names_arg = typer.Argument(None, help="registry spec names (default: the profile's three)")

    @weights.command("status")
    def status_cmd(names: list[str] = names_arg, profile: str = profile_opt, params: Path = params_opt) -> None:
        """List every weight file the profile (or the named specs) needs, present or missing, with sizes."""
        from components.models.weights import weights_status

        label, specs, weights_dir = profile_specs(params, profile)
        specs = list(names) if names else specs
        rows = weights_status(_specs(specs), weights_dir=weights_dir)
        typer.echo(f"profile {label}: {', '.join(specs)}")
        if not rows:
            typer.echo("  no weight files needed (miniature models are built with seeded random weights)")
        for row in rows:
            mark = "present" if row.present else "MISSING"
            typer.echo(f"  {mark:8} {row.spec:22} {row.file:36} {_human(row.size):>9}  {row.path}")
        missing = [r for r in rows if not r.present]
        if missing:
            typer.echo(f"{len(missing)} file(s) missing: fmbseg weights fetch --profile {label}")
            raise typer.Exit(1)

    @weights.command("fetch")
    def fetch_cmd(names: list[str] = names_arg, profile: str = profile_opt, params: Path = params_opt) -> None:
        """Download the weight files the profile (or the named specs) needs and that are not on disk."""
        from components.models.weights import fetch_weights

        label, specs, weights_dir = profile_specs(params, profile)
        specs = list(names) if names else specs
        rows = fetch_weights(_specs(specs), weights_dir=weights_dir, progress=True)
        for row in rows:
            typer.echo(f"  {'present' if row.present else 'MISSING':8} {row.spec:22} {row.file:36} {row.path}")
