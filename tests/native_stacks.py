"""Run a script as __main__ with torch's fatal-signal handler on, so an abort prints every
thread's C++ stack as well as faulthandler's Python ones.

test_examples launches the examples through this: the DeepSpeed example has aborted at
interpreter exit ('terminate called without an active exception': a joinable std::thread
destroyed), in C++ teardown after all Python code ran, and only the native stack can name the
thread's owner. Usage: python tests/native_stacks.py SCRIPT [ARGS...]"""
import os
import runpy
import sys

import torch

if hasattr(torch._C, "_set_print_stack_traces_on_fatal_signal"):  # a private API (Linux builds)
    torch._C._set_print_stack_traces_on_fatal_signal(True)
script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(script)  # as if the script had been run directly
runpy.run_path(script, run_name="__main__")
