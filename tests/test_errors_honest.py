"""Problems of the user's environment and data are one line saying what to do, never "please
report it" (that is kept for easier's own bugs)."""

from __future__ import annotations

import errno

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from easier.cli.failures import describe_failure


@pytest.mark.parametrize("code, words", [
    (errno.EFBIG, "ulimit -f"), (errno.EDQUOT, "quota"), (errno.ENOSPC, "space"),
    (errno.EROFS, "Read-only"), (errno.EACCES, "Permission denied"),
])
def test_os_errors_of_the_environment_say_what_to_do(code, words):
    msg, rc = describe_failure(OSError(code, "ignored", "/r/state.pt"))
    assert rc == 1 and "please report" not in msg and "\n" not in msg
    assert "/r/state.pt" in msg and words in msg and "--resume" in msg


@pytest.mark.parametrize("exc", [
    MemoryError(),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 9999999999 bytes. Error code 12"),
])
def test_allocation_failures_are_one_line_about_memory(exc):
    msg, rc = describe_failure(exc)
    assert rc == 1 and msg.startswith("out of memory") and "please report" not in msg
    assert "--batch-size" in msg and "\n" not in msg


def test_a_real_failed_allocation_is_classified():
    try:
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: no machine has it
    except Exception as exc:
        msg, _ = describe_failure(exc)
    assert msg.startswith("out of memory") and "please report" not in msg


class Lying(Dataset):
    """Says it has 10 items; has 6."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return ([torch.zeros(2)] * 6)[i]


def test_a_dataset_that_lies_about_its_length_is_the_users_problem():
    try:
        list(DataLoader(Lying(), batch_size=4))
    except IndexError as exc:
        msg, rc = describe_failure(exc)
    assert rc == 1 and "__len__" in msg and "please report" not in msg and "\n" not in msg


def test_our_own_index_error_is_still_reported_as_a_bug():
    try:
        [][1]
    except IndexError as exc:
        msg, _ = describe_failure(exc)
    assert "please report" in msg
