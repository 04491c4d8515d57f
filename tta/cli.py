"""The ``tta`` command line. It only parses arguments and calls the library (``tta.api``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from tta.errors import TTAError, path_error

CORRUPTION_HELP = "comma-separated corruption names (default: the 15 benchmark corruptions in the standard order)"


class _UserError(click.ClickException):
    exit_code = 2  # every user error exits 2, as click's own usage and bad-value errors do


class _Group(click.Group):
    """Turns ``TTAError``s and unusable paths (user errors) into one-line messages and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TTAError as err:
            raise _UserError(str(err)) from None
        except OSError as err:
            message = path_error(err)
            if message is None:
                raise
            raise _UserError(message) from None


def _split(cast: Callable[[str], Any], what: str) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return [cast(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {what}, e.g. {param.metavar or ''}") from None

    return parse


FIRST_STEPS = """\
tta: test-time adaptation of pretrained classifiers on shifted data.

Start here (offline: a small digits model and corrupted digits, about a minute on a CPU):

    tta adapt --method tent --benchmark digits

Then: `tta adapt --help` (every option, with examples), `tta methods` (the methods and their settings),
`tta --help` (every command).
"""

ADAPT_EXAMPLES = """\
Examples:

\b
  # offline, about a minute on a CPU:
  tta adapt --method tent --benchmark digits
  # the Tent paper's protocol (downloads CIFAR-10-C and the model):
  tta adapt --method tent --benchmark cifar10c --model Standard
  # your own images, with EATA (clean images for its Fisher) and a guard:
  tta adapt --method eata --data folder:my_images/ --model resnet50 --benchmark imagenetc \\
      --source-data folder:my_clean_images/ --guard default
"""

# help headings of `tta adapt`, by the RunSpec part an option sets
HEADINGS: dict[str, str] = {"model": "Model", "data": "Data", "stream": "Stream", "method": "Method",
                            "source": "Method", "evaluation": "Evaluation and output",
                            "output": "Evaluation and output"}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]}, invoke_without_command=True)
@click.version_option(package_name="tta-toolkit")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Test-time adaptation of pretrained classifiers on shifted data (CIFAR-10-C and your own)."""
    if ctx.invoked_subcommand is None:  # a bare `tta` says what to run first instead of printing its usage
        click.echo(FIRST_STEPS)


class _AdaptCommand(click.Command):
    """``tta adapt``'s help: the options under headings (model, data, stream, method, evaluation and output)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from tta.run.spec import ALIASES, OPTIONS

        groups: dict[str, list[tuple[str, str]]] = {"Run spec": []}
        groups.update({title: [] for title in HEADINGS.values()})
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name = ALIASES.get(param.name or "", (param.name, False))[0] or ""
            name = "set" if name.startswith("set.") else name
            title = HEADINGS[OPTIONS[name][0]] if name in OPTIONS else "Run spec"
            groups[title if name != "help" else "Evaluation and output"].append(record)
        for title, records in groups.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def _deprecated(new: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def warn(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            click.echo(f"warning: {param.opts[0]} is deprecated; use {new} (it means the same)", err=True)
        return value

    return warn


@cli.command("adapt", cls=_AdaptCommand, epilog=ADAPT_EXAMPLES)
@click.option("--spec", type=click.Path(exists=True, dir_okay=False),
              help="run the RunSpec of this YAML file (e.g. the .yaml written beside a run's results); options "
              "given too override its values")
@click.option("--model", help="robustbench corruption-zoo name (Standard, Hendrycks2020AugMix_WRN, ...), torchvision "
              "name (resnet50), timm name (timm:NAME: with timm's own preprocessing), or digits-cnn (default: the "
              "benchmark's model)")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="local CIFAR ResNet checkpoint (with --arch), or the weight file of a --model timm:NAME")
@click.option("--arch", help="architecture of --checkpoint: resnet20|resnet32|resnet44|resnet56|resnet110")
@click.option("--benchmark", default="cifar10c", show_default=True,
              help="cifar10c | cifar100c | imagenetc | imagenet3dcc | digits (offline); with --data only the model "
              "family")
@click.option("--corruption", callback=_deprecated("--benchmark"), hidden=True, help="old name of --benchmark")
@click.option("--data", help="adapt on your own images instead: folder:PATH (PATH/<class>/ or PATH/<domain>/<class>/), "
              "csv:PATH (rows path,label[,domain]) or npz:PATH (x uint8 NHWC, y[, domain])")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="where datasets and downloaded models live")
@click.option("--corruptions", callback=_split(str, "names"), metavar="gaussian_noise,fog", help=CORRUPTION_HELP)
@click.option("--severities", callback=_split(int, "integers"), metavar="5,4,3,2,1",
              help="comma-separated severities in run order (default 5,4,3,2,1)")
@click.option("--n-examples", type=click.IntRange(min=1), help="images per corruption x severity (default: all)")
@click.option("--generate", is_flag=True,
              help="corrupt the clean test set on the fly on the device instead of reading corruption files")
@click.option("--data-seed", default=0, show_default=True, type=int,
              help="seed of the corruptions generated on the fly (--generate, digits)")
@click.option("--clean", help="clean test set for --generate: cifar10, cifar100, npz:PATH or folder:PATH "
              "(default: the benchmark's clean test set)")
@click.option("--source", callback=_deprecated("--clean"), hidden=True, help="old name of --clean")
@click.option("--frost-images", type=click.Path(exists=True, file_okay=False),
              help="folder of frost photographs for --generate (default: a procedural frost texture)")
@click.option("--download/--no-download", default=True, show_default=True, help="download missing dataset files")
@click.option("--setting", default="per-domain", show_default=True,
              type=click.Choice(["per-domain", "continual", "mixed", "gradual", "correlated", "mixed-correlated",
                                 "recurring", "ccc"]),
              help="stream order: one corruption x severity at a time, corruptions back to back per severity, all "
                   "corruptions of a severity shuffled together (--seed), severities 1..5..1 per corruption, the "
                   "continual/mixed streams ordered by class label (correlated, mixed-correlated), the continual "
                   "stream visited --visits times without reset (recurring), or a CCC-style long stream of two "
                   "corruptions per image at walking severities (ccc)")
@click.option("--visits", default=20, show_default=True, type=click.IntRange(min=1),
              help="recurring: how many times the continual stream is visited")
@click.option("--baseline", default=20, show_default=True, type=click.Choice(["40", "20", "0"]),
              callback=lambda _c, _p, v: int(v),
              help="ccc: the source model's accuracy the severities keep the stream near (easy 40, medium 20, hard 0)")
@click.option("--speed", default=2000, show_default=True, type=click.IntRange(min=1),
              help="ccc: images per transition from one corruption to the next (a multiple of --batch-size)")
@click.option("--length", default=300_000, show_default=True, type=click.IntRange(min=1),
              help="ccc: images in the stream")
@click.option("--accuracy-window", default=1000, show_default=True, type=click.IntRange(min=1),
              help="ccc: images per accuracy window (a row each, with the source model's accuracy on it)")
@click.option("--batch-size", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=1, show_default=True, type=int,
              help="the run's seed: it shuffles the mixed settings and seeds torch")
@click.option("--dirichlet", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="correlated settings: concentration of the label-shift Dirichlet (0 = sorted by label)")
@click.option("--order", default="shuffle", show_default=True, type=click.Choice(["shuffle", "file"]),
              help="with --data: images of a domain shuffled (--seed) or in the order of the files")
@click.option("--method", default="tent", show_default=True, help="adaptation method (see `tta methods`)")
@click.option("--set", "set", multiple=True, metavar="KEY=VALUE",
              help="override a method setting, e.g. --set lr=0.0005 (repeatable)")
@click.option("--config", type=click.Path(dir_okay=False), help="YAML file of method settings")
@click.option("--preset", help="named method defaults, e.g. imagenet (see `tta methods`)")
@click.option("--window", type=click.IntRange(min=0, max=4096),
              help="adapt single images on a sliding window of this many recent images (default: 64 with "
              "--batch-size 1, else off)")
@click.option("--guard", type=click.Choice(["default", "monitor", "fallback", "learned"]),
              help="watch label-free signals and skip updates, answer with the source model, roll back or reset "
                   "when adaptation degrades (monitor: signals only; learned: thresholds fitted on corrupted "
                   "--source-data); calibrates on --source-data when given")
@click.option("--contexts", type=click.Choice(["oracle", "infer"]),
              help="dsbn/context-norm: route samples by the stream's domain ids (oracle) or infer them (infer); "
                   "same as --set contexts=...")
@click.option("--afn-checkpoint", type=click.Path(dir_okay=False),
              help="with --method afn: AFN layers warmed up by `tta warmup` (same as --set afn_checkpoint=FILE)")
@click.option("--source-data", help="clean source data for methods that need it (eata's Fisher): cifar10|cifar100 "
              "(training split, in --data-dir), npz:PATH or folder:PATH")
@click.option("--reset", default="domain", show_default=True, type=click.Choice(["domain", "batch", "never"]),
              help="reset before each corruption x severity, before every batch (episodic), or never (continual)")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N")
@click.option("--protocol", default="offline", show_default=True, type=click.Choice(["offline", "online"]),
              help="online: batches arriving while a step runs are predicted without adaptation (Alfarra et al.)")
@click.option("--stream-speed", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="online: the stream's speed relative to plain inference (ETA)")
@click.option("--cost", default="counted", show_default=True, type=click.Choice(["counted", "timed"]),
              help="online: a step's cost from counted passes (a backward = 2 forwards) or from measured time")
@click.option("--out", type=click.Path(dir_okay=False),
              help="CSV to write (default: results/<method>_<model>_<time>.csv)")
@click.option("--resume", is_flag=True,
              help="--out may already hold rows of this run (same config hash): keep them if the run finished, "
                   "else run it again in their place (never duplicate rows)")
@click.option("--batches", is_flag=True, help="also write the accuracy of every batch to <out stem>.batches.csv")
@click.option("--report", type=click.Path(file_okay=False),
              help="also write a markdown report with plots of this run to this directory (see `tta report`)")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--checkpoint-every", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="long streams (recurring, ccc): seconds between checkpoints that --resume continues from")
@click.pass_context
def adapt_command(ctx: click.Context, spec: str | None, **kwargs: Any) -> None:
    """Adapt a model over a corruption benchmark (or your own data) and report accuracy per domain."""
    from click.core import ParameterSource

    from tta.config import parse_overrides
    from tta.run.execute import run
    from tta.run.report import format_results
    from tta.run.spec import RunSpec

    given = {k: v for k, v in kwargs.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    for old, new in (("corruption", "benchmark"), ("source", "clean")):
        if old in given:
            if new in given:
                raise click.UsageError(f"--{old} is the old name of --{new}; pass only --{new}")
            given[new] = given.pop(old)
    given.update({f"set.{k}": v for k, v in parse_overrides(given.pop("set", ())).items()})
    if spec is not None:
        options = {**RunSpec.from_yaml(spec).options(), **given, "progress": kwargs["progress"]}
        result = run(RunSpec.from_options(options, f"--spec {spec} and the options given"))
    else:
        result = run(RunSpec.from_options({**given, "progress": kwargs["progress"]}, "the command line"))
    df = result.results
    click.echo(format_results(df))
    click.echo(f"\nmean accuracy {df['accuracy'].mean():.2f}% over {len(df)} domains; wrote {result.out} "
               f"(+ {result.config.name})")
    if result.report is not None:
        click.echo(f"report: {result.report}")


@cli.command("corrupt")
@click.option("--clean", help="clean set (required): cifar10, cifar100 (test split), npz:PATH (arrays x uint8 NHWC, y) "
              "or folder:PATH")
@click.option("--source", callback=_deprecated("--clean"), hidden=True, help="old name of --clean")
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
def corrupt_command(out: str, severities: list[int] | None, device: str, clean: str | None, source: str | None,
                    **kwargs: Any) -> None:
    """Write corrupted copies of a clean image set in the CIFAR-10-C layout; a killed run resumes where it stopped."""
    if (clean is None) == (source is None):
        raise click.UsageError("pass the clean set once, with --clean (--source is its old name)")
    from tta.data.cifar_c import ALL_CORRUPTIONS
    from tta.data.writer import corrupt_dataset, missing_blocks
    from tta.devices import resolve_device

    root = corrupt_dataset(clean or str(source), out_dir=out, severities=severities or [1, 2, 3, 4, 5],
                           device=resolve_device(device), **kwargs)
    files = sorted(p.name for p in root.glob("*.npy"))
    click.echo(f"{root}: {len(files)} files ({', '.join(files)})")
    waiting = missing_blocks(root, kwargs["corruptions"] or ALL_CORRUPTIONS)
    for name, missing in waiting.items():
        click.echo(f"{name}.npy waits for severities {','.join(map(str, missing))} (run again with --severities)")


@cli.command("warmup")
@click.option("--method", default="afn", show_default=True, type=click.Choice(["afn", "proxy-norm"]),
              help="conversion to warm up on clean source data: AFN layers, or Proxy Normalization (batch-independent "
              "norm -> PN-Act layers, for adapting one image at a time)")
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
@click.option("--epochs", type=click.IntRange(min=0), help="passes over the source data (default: 5 for afn, 12 for "
              "proxy-norm)")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--augment/--no-augment", default=True, show_default=True, help="random crop (pad 4) and flip")
@click.option("--loss", type=click.Choice(["ce", "distill", "ce+distill"]),
              help="cross-entropy, distillation from the original model's logits, or both (default: ce for afn, "
              "ce+distill for proxy-norm)")
@click.option("--n-images", type=click.IntRange(min=2), help="use only the first N source images (default: all)")
@click.option("--lambda-init", type=click.Choice(["paper", "official"]), help="afn: fusion weights' init (paper)")
@click.option("--identity-init/--no-identity-init", default=None,
              help="afn: start the AFN decoders at zero (close to the pretrained BN) instead of random (default on)")
@click.option("--norm", type=click.Choice(["layer", "group"]),
              help="proxy-norm: LayerNorm over each image's channels and pixels, or GroupNorm (default layer)")
@click.option("--groups", type=click.IntRange(min=1), help="proxy-norm with --norm group: groups per layer (8)")
@click.option("--calibrate", default=512, show_default=True, type=click.IntRange(min=0),
              help="proxy-norm: source images that initialise the converted layers to mimic BN (0: none)")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint file to write")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="continue an interrupted run with the same arguments from OUT.resume (written every epoch)")
@click.option("--download/--no-download", default=True, show_default=True, help="download a missing training set")
@click.option("--progress/--no-progress", default=True, show_default=True)
def warmup_command(lambda_init: str | None, identity_init: bool | None, norm: str | None, groups: int | None,
                   **kwargs: Any) -> None:
    """Convert a BN model's normalisation layers (AFN or Proxy Normalization) and fine-tune them on clean data.

    Writes a self-describing checkpoint: `tta adapt --checkpoint OUT` loads it without --arch.
    """
    from tta.warmup import get_conversion, run_warmup

    given = {"lambda_init": lambda_init, "identity_init": identity_init, "norm": norm, "groups": groups}
    warm, out = run_warmup(settings={k: v for k, v in given.items() if v is not None}, **kwargs)
    for h in warm.history:
        click.echo(f"epoch {h['epoch']}: loss {h['loss']:.4f}, train accuracy {100 * h['train_accuracy']:.2f}%")
    click.echo(f"warmed up {warm.warmup['n_images']} images x {warm.warmup['epochs']} epochs in "
               f"{warm.warmup['seconds'] / 60:.1f} min on {warm.warmup['device']}; wrote {out}")
    hint = get_conversion(warm.method).adapt_with.format(source=kwargs["source"])
    click.echo(f"use it with: tta adapt --checkpoint {out} {hint}")


@cli.command("sweep")
@click.argument("grid", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="directory of the grid's results: results.csv, batches.csv, runs/<hash>/ per finished run")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="runs at once on this machine (spawned workers; with GPUs, worker i keeps GPU i mod their count)")
@click.option("--backend", default="local", show_default=True, type=click.Choice(["local", "ray"]),
              help="local processes, or one Ray task per run (pip install 'tta-toolkit[ray]')")
@click.option("--address", help="with --backend ray: the cluster to join (e.g. auto, or ray://host:10001); "
              "default: start a local Ray instance")
@click.option("--gpus-per-run", type=click.FloatRange(min=0),
              help="with --backend ray: GPUs each run asks for (default 1 when the cluster has GPUs, else 0)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def sweep_command(grid: str, out: str, **kwargs: Any) -> None:
    """Run a grid of `tta adapt` runs (a YAML file with base: and grid: mappings); started again, it runs only the
    missing ones."""
    from tta.run.report import format_summary
    from tta.run.sweep import run_sweep

    result = run_sweep(grid, out, **kwargs)
    if len(result.results):
        click.echo(format_summary(result.results))
    click.echo(f"\n{len(result.ran)} run(s) done now, {len(result.skipped)} found done, {len(result.failed)} failed; "
               f"results in {result.out / 'results.csv'} (tables and plots: tta report {result.out} --out REPORT_DIR)")
    if result.failed:
        raise click.ClickException("failed runs (fix them and run the same command again):\n" +
                                   "\n".join(result.failed.values()))


@cli.command("report")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="directory for report.md and the plots")
def report_command(inputs: tuple[str, ...], out: str) -> None:
    """Tables (markdown) and plots (PNG) from `tta sweep` directories or `tta adapt` result CSVs."""
    from tta.run.report import write_report

    click.echo(f"wrote {write_report(inputs, out)}")


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
