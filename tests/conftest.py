"""Fixtures for every test file: the tiny datasets, a shared tiny run, torchrun's logs in pytest's temp folder."""
import pytest

import train

from helpers import tiny_args, write_cifar_folder


@pytest.fixture(scope="session", autouse=True)
def torchrun_logs_in_pytest_temp(tmp_path_factory):
    """torchrun's agents make a log folder per launch, in /tmp/torchelastic_* unless told (PET_LOG_DIR is
    its --log-dir): into pytest's own temporary folder, which pytest clears."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PET_LOG_DIR", str(tmp_path_factory.mktemp("torchrun-logs")))
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_cifar_folder(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def fp16_data_dir(tmp_path_factory):
    """fp16 on a CPU runs reference kernels (0.37 s per image, forward and backward): 8 test images."""
    return write_cifar_folder(str(tmp_path_factory.mktemp("data_fp16")), test_count=8)


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """One tiny 2-epoch run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(tiny_args(data_dir, out)) == 0
    return out
