"""The text form of a training command line. Imports neither PyTorch nor transformers.

Contract: ``normalize_argv(argv)`` expands ``--config FILE.yaml`` in place (later flags win) and
translates the spellings that transformers 5 renamed (``--evaluation_strategy``, ``--warmup_ratio``,
``--group_by_length``, a bare ``--resume_from_checkpoint``) and the original scripts' flash-attention
switches (``--use_flash_attention_2``, ``--flash_attn``); it is pure text, done once per run.
``skipped_speedups(argv)`` reads what a normalized command line leaves out of the speed-ups, for
the entry to set up the process before the flags are parsed (parsing imports PyTorch).
"""

from __future__ import annotations

from ..options import ArgumentError, expand_config, flag_value

# transformers 5 renamed or removed these TrainingArguments; the documented command still uses them.
_RENAMED = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
# The original scripts' switches for flash attention (v2's, v1's): --attn_implementation flash_attention_2.
_FLASH = ("--use_flash_attention_2", "--flash_attn")
_TRUTH = {"true": True, "t": True, "yes": True, "y": True, "1": True}
_TRUTH.update({"false": False, "f": False, "no": False, "n": False, "0": False})


def _switch(argv: list[str], i: int) -> tuple[bool, int]:
    """A switch written bare, ``--flag VALUE`` or ``--flag=VALUE``: (on, index of its last word)."""
    name, eq, value = argv[i].partition("=")
    if not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
        return True, i
    if not eq:
        value, i = argv[i + 1], i + 1
    on = _TRUTH.get(value.lower())
    if on is None:
        raise ArgumentError(f"{name} {value}: give True or False")
    return on, i


def translate_legacy(argv: list[str]) -> list[str]:
    out, taken = [], -1
    for i, arg in enumerate(argv):
        if i <= taken:
            continue  # the True/False after a switch, already read
        name, eq, value = arg.partition("=")
        bare = not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        if name in _FLASH:
            on, taken = _switch(argv, i)
            out += ["--attn_implementation", "flash_attention_2"] if on else []
        elif name == "--resume_from_checkpoint" and bare:
            out += [name, "latest"]
        elif name == "--debug" and bare:
            out.append("--debug_errors")
        elif name in _RENAMED:
            out.append(_RENAMED[name] + eq + value)
        elif name == "--group_by_length":
            on, taken = _switch(argv, i)
            out += ["--train_sampling_strategy", "group_by_length"] if on else []
        else:
            out.append(arg)
    return out


def normalize_argv(argv: list[str]) -> list[str]:
    return translate_legacy(expand_config(list(argv)))


def skipped_speedups(argv: list[str]) -> set[str]:
    """The speed-ups a normalized command line leaves out: every one under ``--speedups off``."""
    if (flag_value(argv, "--speedups") or "auto").strip() == "off":
        return {"*"}
    return {name.strip() for name in (flag_value(argv, "--skip_speedups") or "").split(",") if name.strip()}
