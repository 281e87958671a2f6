"""The one exception type that reaches the user as a single line."""


class PcdError(Exception):
    """A problem with the user's input: the CLI prints its message on one line and exits non-zero.

    The message must name the file (or scene) and what is wrong with it.
    """


def torch_load_reason(exc: BaseException) -> str:
    """Why torch.load refused a file, in its first sentence: torch's messages go on to advise
    `weights_only=False`, which pcd never does and must not suggest to users."""
    text = " ".join(str(exc).split())
    unsupported = text.find("Unsupported global:")
    if unsupported >= 0:  # the refused class is the useful part, after torch's paragraph of advice
        return text[unsupported:].split(". ")[0]
    return f"{type(exc).__name__}: {text.split('. ')[0]}" if text else type(exc).__name__


# The exit status of a training job stopped by SIGTERM/SIGUSR1 after saving its checkpoint: EX_TEMPFAIL of
# sysexits.h ("temporary failure; the user is invited to retry"). A job script resubmits (or requeues) on it.
RESUMABLE_EXIT_CODE = 75


class Preempted(Exception):
    """A training run stopped on a preemption signal after saving a checkpoint it can resume from."""

    exit_code = RESUMABLE_EXIT_CODE
