"""Toy loader that fails the upstream way: reports itself, puts "exit", then exits 1."""

import argparse
import sys


def add_arguments(parser):
    pass


def load_checkpoint(queue, args):
    queue.put(argparse.Namespace(model_type=args.model_type, num_layers=0, source="toyexit"))
    print("toyexit: cannot read the checkpoint", file=sys.stderr)
    queue.put("exit")
    sys.exit(1)
