"""``llama-sft`` subcommands. Each is a plain function taking its own argv."""

from __future__ import annotations

import argparse
import sys

from .options import add_config, parse_command


def cmd_train(argv: list[str]) -> None:
    from .training.command_line import main

    main(argv)


def cmd_pretrain(argv: list[str]) -> None:
    from .training.command_line import main

    main(argv, task="pt")


def cmd_dpo(argv: list[str]) -> None:
    from .training.command_line import main

    main(argv, task="dpo")


def cmd_demo(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="llama-sft demo", description="Train a tiny model on generated data."
    )
    add_config(parser)
    parser.add_argument("--output_dir", default="demo_output", help="Where the demo writes everything.")
    parser.add_argument("--steps", type=int, default=400, help="Optimizer steps.")
    args = parse_command(parser, argv)
    from .training.command_line import prepare_process

    prepare_process([])  # the demo trains: set up the process as `llama-sft train` does
    from .tools.demo import run_demo

    result = run_demo(args.output_dir, args.steps)
    if result["after"] <= result["before"]:
        sys.exit("demo: accuracy did not improve")


def cmd_merge(argv: list[str]) -> None:
    from .tools.merge import main

    main(argv)


def cmd_merge_tokenizer(argv: list[str]) -> None:
    from .tools.merge_tokenizer import main

    main(argv)


def cmd_export(argv: list[str]) -> None:
    from .tools.export import main

    main(argv)


def cmd_chat(argv: list[str]) -> None:
    from .tools.chat import main

    main(argv)


def cmd_eval(argv: list[str]) -> None:
    from .tools.evaluate import main

    main(argv)


def cmd_preview(argv: list[str]) -> None:
    from .tools.preview import main

    main(argv)


def cmd_serve(argv: list[str]) -> None:
    from .tools.serve import main

    main(argv)


COMMANDS = {
    "train": cmd_train,
    "pretrain": cmd_pretrain,
    "dpo": cmd_dpo,
    "demo": cmd_demo,
    "merge": cmd_merge,
    "merge-tokenizer": cmd_merge_tokenizer,
    "export": cmd_export,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "eval": cmd_eval,
    "preview": cmd_preview,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: llama-sft {{{names}}} [flags]   (llama-sft COMMAND --help for each)", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
