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
@click.option("--setting", default="per-domain", show_default=True,
              type=click.Choice(["per-domain", "continual", "mixed", "gradual"]),
              help="stream order: one corruption x severity at a time, corruptions back to back per severity, all "
                   "corruptions of a severity shuffled together (--seed), or severities 1..5..1 per corruption")
@click.option("--contexts", type=click.Choice(["oracle", "infer"]),
              help="dsbn/context-norm: route samples by the stream's domain ids (oracle) or infer them (infer); "
                   "same as --set contexts=...")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a method setting, e.g. --set lr=0.0005 (repeatable)")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML file of method settings")
@click.option("--out", type=click.Path(dir_okay=False),
              help="CSV to write (default: results/<method>_<model>_<time>.csv)")
@click.option("--download/--no-download", default=True, show_default=True, help="download missing dataset files")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--generate", is_flag=True,
              help="corrupt the clean test set on the fly on the device instead of reading corruption files")
@click.option("--data-seed", default=0, show_default=True, type=int, help="seed of the --generate corruptions")
@click.option("--source", help="clean set for --generate: cifar10, cifar100, npz:PATH or folder:PATH "
              "(default: the benchmark's clean test set)")
@click.option("--frost-images", type=click.Path(exists=True, file_okay=False),
              help="folder of frost photographs for --generate (default: a procedural frost texture)")
@click.option("--source-data", help="clean source data for methods that need it (eata's Fisher): cifar10|cifar100 "
              "(training split, in --data-dir), npz:PATH or folder:PATH")
@click.option("--window", type=click.IntRange(min=0, max=4096),
              help="adapt single images on a sliding window of this many recent images (default: 64 with "
              "--batch-size 1, else off)")
@click.option("--preset", help="named method defaults, e.g. imagenet (see `tta methods`)")
@click.option("--guard", type=click.Choice(["default", "monitor", "fallback"]),
              help="watch label-free signals and skip updates, answer with the source model, roll back or reset "
                   "when adaptation degrades (monitor: signals only); calibrates on --source-data when given")
@click.option("--afn-checkpoint", type=click.Path(dir_okay=False),
              help="with --method afn: AFN layers warmed up by `tta warmup` (same as --set afn_checkpoint=FILE)")
def adapt_command(overrides: tuple[str, ...], progress: bool, afn_checkpoint: str | None, **kwargs: Any) -> None:
    """Adapt a model over a corruption benchmark and report accuracy per corruption x severity."""
    from tta.api import run_benchmark
    from tta.config import parse_overrides
    from tta.report import format_results

    settings = parse_overrides(overrides)
    if afn_checkpoint is not None:
        if kwargs["method"] != "afn":
            raise click.UsageError(f"--afn-checkpoint applies to --method afn, not {kwargs['method']}")
        settings["afn_checkpoint"] = afn_checkpoint
    df, out = run_benchmark(overrides=settings, progress=progress, **kwargs)
    click.echo(format_results(df))
    click.echo(f"\nmean accuracy {df['accuracy'].mean():.2f}% over {len(df)} corruption x severity pairs; "
               f"wrote {out} (+ {out.with_suffix('.yaml').name})")


@cli.command("corrupt")
@click.option("--source", required=True,
              help="clean set: cifar10, cifar100 (test split), npz:PATH (arrays x uint8 NHWC, y) or folder:PATH")
@click.option("--out", default="data", show_default=True, type=click.Path(file_okay=False),
              help="writes OUT/CIFAR-10-C (OUT/CIFAR-100-C for cifar100) in the published layout")
@click.option("--corruptions", callback=_split(str, "names"), metavar="gaussian_noise,fog",
              help="comma-separated corruption names (default: all 19, the 15 benchmark and 4 extra ones)")
@click.option("--severities", callback=_split(int, "integers"), metavar="1,2,3,4,5",
              help="severity blocks to generate in this run (default all); a corruption's .npy appears once all "
              "five blocks exist, so runs can be split across machines")
@click.option("--seed", default=0, show_default=True, type=int, help="image i depends only on (seed, corruption, "
              "severity, i)")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N")
@click.option("--dataset", type=click.Choice(["cifar10c", "cifar100c"]),
              help="directory layout to write (default: cifar100c for --source cifar100, else cifar10c)")
@click.option("--frost-images", type=click.Path(exists=True, file_okay=False),
              help="folder of frost photographs (default: a procedural frost texture)")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="where cifar10/cifar100 are looked for and downloaded (default: --out)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def corrupt_command(out: str, severities: list[int] | None, device: str, **kwargs: Any) -> None:
    """Write corrupted copies of a clean image set in the CIFAR-10-C layout; a killed run resumes where it stopped."""
    from tta.data.cifar_c import ALL_CORRUPTIONS
    from tta.data.writer import corrupt_dataset, missing_blocks
    from tta.engine import resolve_device

    root = corrupt_dataset(out_dir=out, severities=severities or [1, 2, 3, 4, 5], device=resolve_device(device),
                           **kwargs)
    files = sorted(p.name for p in root.glob("*.npy"))
    click.echo(f"{root}: {len(files)} files ({', '.join(files)})")
    waiting = missing_blocks(root, kwargs["corruptions"] or ALL_CORRUPTIONS)
    for name, missing in waiting.items():
        click.echo(f"{name}.npy waits for severities {','.join(map(str, missing))} (run again with --severities)")


@cli.command("warmup")
@click.option("--method", default="afn", show_default=True, type=click.Choice(["afn"]),
              help="method whose layers to warm up on clean source data")
@click.option("--source", required=True,
              help="clean source data: cifar10|cifar100 (the training split, in --data-dir), npz:PATH (x uint8 NHWC, "
              "y int labels) or folder:PATH (an ImageFolder)")
@click.option("--model", default="Standard", show_default=True,
              help="robustbench corruption-zoo name, torchvision or timm name (or --checkpoint with --arch)")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="local CIFAR ResNet checkpoint (with --arch)")
@click.option("--arch", help="architecture of --checkpoint: resnet20|resnet32|resnet44|resnet56|resnet110")
@click.option("--dataset", default="cifar10", show_default=True, type=click.Choice(["cifar10", "cifar100"]),
              help="what the model classifies (robustbench zoo and number of classes)")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="where datasets and downloaded models live")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=0))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--augment/--no-augment", default=True, show_default=True, help="random crop (pad 4) and flip")
@click.option("--n-images", type=click.IntRange(min=2), help="use only the first N source images (default: all)")
@click.option("--lambda-init", default="paper", show_default=True, type=click.Choice(["paper", "official"]))
@click.option("--identity-init/--no-identity-init", default=True, show_default=True,
              help="start the AFN decoders at zero (close to the pretrained BN) instead of random")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint file to write")
@click.option("--download/--no-download", default=True, show_default=True, help="download a missing training set")
@click.option("--progress/--no-progress", default=True, show_default=True)
def warmup_command(**kwargs: Any) -> None:
    """Train only the AFN layers of a converted BN model with cross-entropy on clean source data."""
    from tta.warmup import run_warmup

    warm, out = run_warmup(**kwargs)
    for h in warm.history:
        click.echo(f"epoch {h['epoch']}: loss {h['loss']:.4f}, train accuracy {100 * h['train_accuracy']:.2f}%")
    click.echo(f"warmed up {warm.warmup['n_images']} images x {warm.warmup['epochs']} epochs in "
               f"{warm.warmup['seconds'] / 60:.1f} min on {warm.warmup['device']}; wrote {out}")
    click.echo(f"use it with: tta adapt --method afn --afn-checkpoint {out} (and the same model options)")


@cli.command("methods")
def methods_command() -> None:
    """List the adaptation methods and their default settings."""
    from tta.config import to_dict
    from tta.methods import describe, get_method, list_methods

    for name in list_methods():
        cls = get_method(name)
        click.echo(f"{name:14s} {describe(name)}")
        settings = ", ".join(f"{k}={v}" for k, v in to_dict(cls.Config()).items())
        if settings:
            click.echo(f"{'':14s}   {settings}")
        if cls.presets:
            click.echo(f"{'':14s}   presets: {', '.join(cls.presets)}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="tta")


if __name__ == "__main__":
    main()
