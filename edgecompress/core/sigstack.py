"""Keep the thread's signal stack valid across OpenVINO's CPU plugin.

Each OpenVINO CPU plugin (one per ``ov.Core`` that compiles or asks the CPU anything) maps a signal stack
(``sigaltstack``, room for AMX state) onto the thread that makes it, remembering the stack it found; when the
plugin is destroyed it unmaps its stack and, if that stack is still the thread's, puts back the one it found.
Two plugins destroyed in the order they were made (NNCF makes a Core per statistics pass, each compiled model
keeps its plugin alive) leave the thread on an unmapped stack. Python runs every signal handler on that stack
(``SA_ONSTACK``), so the next handled signal is a segmentation fault: Ctrl-C, or the SIGCHLD of an ended
subprocess once torch's DataLoader has installed its handler (CI's exit 139).

:func:`keep_signal_stack` puts the thread on a stack of ours that is never unmapped. Plugins made before the call
then never touch the thread's stack again (they restore only when theirs is current), so calling it after the
code that makes plugins (compiling, NNCF's quantization) keeps every later signal safe.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading

STACK_BYTES = 256 * 1024  # far above the kernel's minimum with AMX state (about 11 KiB where measured)


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_local = threading.local()  # the stack is per thread, so ours is too


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def current_signal_stack() -> tuple[int, int]:
    """(address, size) of this thread's signal stack; (0, 0) where none is set or the platform has none."""
    if not sys.platform.startswith("linux"):
        return 0, 0
    old = _StackT()
    if _libc().sigaltstack(None, ctypes.byref(old)) != 0 or old.ss_flags & 2:  # SS_DISABLE
        return 0, 0
    return int(old.ss_sp or 0), int(old.ss_size)


def keep_signal_stack() -> None:
    """Put this thread on its own never-unmapped signal stack (Linux; elsewhere nothing to do)."""
    if not sys.platform.startswith("linux"):
        return
    if getattr(_local, "stack", None) is None:
        buffer = mmap.mmap(-1, STACK_BYTES)
        _local.stack = (buffer, ctypes.c_char.from_buffer(buffer))  # the export pins the mapping for good
    address = ctypes.addressof(_local.stack[1])
    if current_signal_stack()[0] == address:
        return
    ours = _StackT(ss_sp=address, ss_flags=0, ss_size=STACK_BYTES)
    _libc().sigaltstack(ctypes.byref(ours), None)  # fails only while on a signal stack: nothing to fix then
