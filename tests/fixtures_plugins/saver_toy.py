"""Toy saver: writes every message's tensors to SAVE_DIR/toy.pt, exits 1 on "exit" (as upstream's)."""

import os
import sys

import torch


def add_arguments(parser):
    parser.add_argument_group(title="saver_toy").add_argument("--toy-note", default="", help="Stored in the output")


def save_checkpoint(queue, args):
    md = queue.get()
    if md == "exit":
        sys.exit(1)
    tensors = {}
    while True:
        msg = queue.get()
        if msg == "exit":
            sys.exit(1)
        if msg == "done":
            break
        tensors[msg["name"]] = msg["weight"].clone()
    os.makedirs(args.save_dir, exist_ok=True)
    out = {"metadata": vars(md), "tensors": tensors, "note": args.toy_note}
    torch.save(out, os.path.join(args.save_dir, "toy.pt"))
