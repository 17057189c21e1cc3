"""The `onnxserve` command: serve, export, samples, demo, bench, tune."""

from __future__ import annotations

import argparse
import shlex
import sys

from onnxserve.serving.settings import (
    add_repository_argument,
    add_setting_arguments,
    settings_from_arguments,
)


def _add_serve(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from onnxserve.serving.triton_flags import add_triton_flags

    p = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC and HTTP (KServe V2)",
        description="Serve a model repository over the KServe V2 gRPC protocol. Every flag "
                    "also reads the ONNXSERVE_* variable it names; a flag wins over its "
                    "variable.")
    add_setting_arguments(p)
    add_triton_flags(p)
    p.set_defaults(func=_run_serve)
    return p


def _run_serve(args: argparse.Namespace) -> int:
    from onnxserve.serving.observability.tracing import parse_trace_config
    from onnxserve.serving.triton_flags import apply_triton_tls

    apply_triton_tls(args.parser, args)
    try:
        settings = settings_from_arguments(args)
        parse_trace_config(settings.trace_config)  # refused now, before any port opens
    except ValueError as exc:
        print(f"onnxserve serve: {exc}", file=sys.stderr)
        return 2
    if not settings.model_repository.is_dir():
        print(f"onnxserve serve: model repository {settings.model_repository} is not a folder; "
              "export a model into it first (offline: onnxserve export lenet5 --dataset "
              f"digits --model-repository {shlex.quote(str(settings.model_repository))}), "
              "or run `make demo`, which exports the default models", file=sys.stderr)
        return 2
    from onnxserve.serving.workers import run_server, run_workers

    if settings.workers > 1:
        return run_workers(settings)
    return run_server(settings)


def build_parser() -> argparse.ArgumentParser:
    from onnxserve.benchmarks.bench import add_bench_parser
    from onnxserve.benchmarks.tune.command import add_tune_parser
    from onnxserve.export.cli import add_export_parser, add_samples_parser
    from onnxserve.serving.commands.demo import add_demo_parser
    from onnxserve.serving.commands.health import add_health_parser

    parser = argparse.ArgumentParser(
        prog="onnxserve", description="Export Keras CNNs to ONNX and serve them over gRPC."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    add_repository_argument(add_export_parser(subparsers))
    add_samples_parser(subparsers)
    add_repository_argument(add_demo_parser(subparsers))
    add_repository_argument(add_bench_parser(subparsers))
    add_repository_argument(add_tune_parser(subparsers))
    add_health_parser(subparsers)
    for subparser in subparsers.choices.values():
        subparser.set_defaults(parser=subparser)  # whose usage an error is said with
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from onnxserve.serving.process import die_with_parent_if_asked

    die_with_parent_if_asked()  # started by process.spawn: go when the parent goes
    if argv[:1] == ["serve"]:
        # Before the heavy imports (grpc, onnxruntime: about a second): a stop from now on
        # exits 0 instead of killing the process (see serving/workers.py).
        from onnxserve.serving.workers import exit_on_stop_signals

        exit_on_stop_signals()
    else:
        # serve sets logging up from its settings (--log-level, --log-format) once it has
        # them (workers.run_server, run_workers); the other commands log as its default.
        from onnxserve.serving.observability.logs import configure

        configure()
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        # said by the subcommand's parser, with its usage, not the top-level one's
        parser = getattr(args, "parser", None)
        if parser is not None:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
