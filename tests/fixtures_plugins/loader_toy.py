"""Toy loader: metadata, --toy-messages tensor messages, "done" (or no "done" with --toy-skip-done)."""

import argparse

import torch


def add_arguments(parser):
    group = parser.add_argument_group(title="loader_toy")
    group.add_argument("--toy-messages", type=int, default=2, help="How many tensor messages to send")
    group.add_argument("--toy-skip-done", action="store_true", help="Return without sending 'done'")
    group.add_argument("--toy-fail-at", type=int, default=-1, help="Raise before sending this message")


def message(i):
    return {"name": f"layer {i}", "weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) + i}


def load_checkpoint(queue, args):
    queue.put(argparse.Namespace(model_type=args.model_type, num_layers=args.toy_messages, source="toy"))
    for i in range(args.toy_messages):
        if i == args.toy_fail_at:
            raise RuntimeError(f"toy loader broke at message {i}")
        queue.put(message(i))
    if not args.toy_skip_done:
        queue.put("done")
