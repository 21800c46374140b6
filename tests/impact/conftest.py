"""The impact tests train tiny nets, one torch thread each as the study's worker processes do: more threads gain
nothing on nets this small, and on a loaded machine (or beside pytest-xdist's other worker) they oversubscribe
the cores and make a 20-step run take seconds instead of a fraction of one."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
