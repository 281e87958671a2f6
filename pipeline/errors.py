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
