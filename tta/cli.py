"""The ``tta`` command line. It only parses arguments and calls the library (``tta.api``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from tta.errors import TTAError

CORRUPTION_HELP = "comma-separated corruption names (default: the 15 benchmark corruptions in the standard order)"


class _Group(click.Group):
    """Turns ``TTAError``s (user errors) into one-line messages and a non-zero exit, without a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TTAError as err:
            raise click.ClickException(str(err)) from None


def _split(cast: Callable[[str], Any], what: str) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return [cast(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {what}, e.g. {param.metavar or ''}") from None

    return parse


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tta")
def cli() -> None:
    """Test-time adaptation of pretrained classifiers on shifted data (CIFAR-10-C and your own)."""


@cli.command("adapt")
@click.option("--method", default="tent", show_default=True, help="adaptation method (see `tta methods`)")
@click.option("--corruption", "benchmark", default="cifar10c", show_default=True,
              help="corruption benchmark: cifar10c or cifar100c")
@click.option("--model", default="Standard", show_default=True,
              help="robustbench corruption-zoo name (Standard, Hendrycks2020AugMix_WRN, ...), torchvision or timm name")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="local CIFAR ResNet checkpoint (with --arch)")
@click.option("--arch", help="architecture of --checkpoint: resnet20|resnet32|resnet44|resnet56|resnet110")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="where datasets and downloaded models live")
@click.option("--corruptions", callback=_split(str, "names"), metavar="gaussian_noise,fog", help=CORRUPTION_HELP)
@click.option("--severities", callback=_split(int, "integers"), metavar="5,4,3,2,1",
              help="comma-separated severities in run order (default 5,4,3,2,1)")
@click.option("--n-examples", type=click.IntRange(min=1), help="images per corruption x severity (default: all)")
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--reset", default="domain", show_default=True, type=click.Choice(["domain", "batch", "never"]),
              help="reset before each corruption x severity, before every batch (episodic), or never (continual)")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a method setting, e.g. --set lr=0.0005 (repeatable)")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML file of method settings")
@click.option("--out", type=click.Path(dir_okay=False), help="CSV to write (default results/<method>_<model>_<time>.csv)")
@click.option("--download/--no-download", default=True, show_default=True, help="download missing dataset files")
@click.option("--progress/--no-progress", default=True, show_default=True)
def adapt_command(overrides: tuple[str, ...], progress: bool, **kwargs: Any) -> None:
    """Adapt a model over a corruption benchmark and report accuracy per corruption x severity."""
    from tta.api import run_benchmark
    from tta.config import parse_overrides
    from tta.report import format_results

    df, out = run_benchmark(overrides=parse_overrides(overrides), progress=progress, **kwargs)
    click.echo(format_results(df))
    click.echo(f"\nmean accuracy {df['accuracy'].mean():.2f}% over {len(df)} corruption x severity pairs; "
               f"wrote {out} (+ {out.with_suffix('.yaml').name})")


@cli.command("methods")
def methods_command() -> None:
    """List the adaptation methods and their default settings."""
    from tta.config import to_dict
    from tta.registry import get_method, list_methods

    for name in list_methods():
        settings = ", ".join(f"{k}={v}" for k, v in to_dict(get_method(name).Config()).items())
        click.echo(f"{name:14s} {settings}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="tta")


if __name__ == "__main__":
    main()
