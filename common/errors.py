"""One-line errors for bad user input, and the CLI wrapper that prints them without a traceback."""

import os
import sys

# Set by torchrun / accelerate launch, and by mpirun (Intel MPI / MVAPICH, Open MPI).
_RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


class UserError(Exception):
    """Bad input the user can fix. The message names the problem and the fix, on one line."""


def run_cli(main, *args):
    """Call `main(*args)`; a UserError becomes `error: <message>` on stderr and exit status 2.

    Under a multi-process launch, processes other than rank 0 prefix the message with their rank.
    They are not silenced: an error only some processes raise (a dataset missing on one machine)
    would then vanish. Errors known to hit every process are printed once by raising
    `common.checkpoint.error_on_every_process`.
    """
    try:
        return main(*args)
    except UserError as exc:
        _close_progress_bars()
        print(f"error: {_rank_prefix()}{exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _close_progress_bars()
        # Ctrl-C reaches every process of the launch at once: one line is enough.
        if not _rank_prefix():
            print("interrupted", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars():
    """Close the tqdm bars still on screen, so the message starts on a line of its own instead
    of being glued to the end of a bar (closing one ends its line)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone must not hide the error itself
            pass


def process_rank():
    """This process's global rank from the launcher's environment (torchrun, mpirun, ...); 0
    when launched without one."""
    for name in _RANK_VARIABLES:
        rank = os.environ.get(name, "")
        if rank.isdigit():
            return int(rank)
    return 0


def is_rank_zero():
    """Whether this process prints the once-per-run warnings."""
    return process_rank() == 0


def _rank_prefix():
    rank = process_rank()
    return f"[rank {rank}] " if rank > 0 else ""
