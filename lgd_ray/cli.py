"""Shared command line: `python -m lgd_ray.<verb> CONFIG [key=value ...] [flags]`; config errors print one line."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from lgd_ray import storage, torch_build
from lgd_ray.config import Config, load_config
from lgd_ray.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: PROG: what is wrong (see --help)`, exit status 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def unusable_gpu() -> str:
    """'' unless this machine has an NVIDIA GPU that the installed torch cannot use (a CPU build, or a CUDA newer than
    the driver runs), else what to do. Asks torch without creating a CUDA context."""
    driver = torch_build.driver_version()
    if driver is None:
        return ""
    import torch  # here: light commands (report) need not import it where there is no GPU

    if torch.cuda.is_available():
        return ""
    try:
        build = torch_build.cuda_build(driver)
    except ValueError as e:
        return str(e)
    have = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
    return (f"device: this machine has an NVIDIA GPU (driver {driver[0]}.{driver[1]}) that torch {torch.__version__} "
            f"({have}) cannot use, so everything runs on the CPU; install the {build} build: `make venv` picks it "
            f"(TORCH_INDEX={torch_build.index_url(build)})")


def run_cli(prog: str, description: str, argv: list[str], work: Callable[[Config, argparse.Namespace], None],
            add_flags: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse CONFIG and overrides, run `work(cfg, args)`; a ConfigError exits 2 with its one-line message."""
    parser = Parser(prog=f"python -m {prog}", description=description)
    parser.add_argument("config", help="a name in configs/ (digits, fashion-mnist, ...) or a path to a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. guidance.omega=0.5")
    if add_flags:
        add_flags(parser)
    args = parser.parse_intermixed_args(argv)  # overrides before or after the flags

    def configured_work():
        cfg = load_config(args.config, args.overrides)
        storage.configure(cfg.storage.retry_s)
        work(cfg, args)

    one_line_errors(configured_work)


def one_line_errors(work: Callable[[], object]):
    """Run `work` (after saying, in one line, if this machine's GPU is one torch cannot use); a UserError exits 2
    with its one-line message instead of a traceback."""
    problem = unusable_gpu()
    if problem:
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    try:
        work()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
