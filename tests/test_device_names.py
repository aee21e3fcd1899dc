"""A device name torch does not know is a ModelError for library callers too (found by the mutation review of
audit.models.base, session 50): ``resolve_device("gpu")`` raised torch's RuntimeError."""
import pytest

from audit.config import device_dtype_problem
from audit.errors import ModelError
from audit.models.base import device_name_problem, resolve_device


@pytest.mark.parametrize("name", ["gpu", "CPU", "cuda:x", "cuda:", "", "cpu ", None, 0])
def test_a_name_that_is_no_device_is_a_model_error_naming_it(name):
    with pytest.raises(ModelError) as err:
        resolve_device(name)
    assert str(err.value) == f"--device {name}: choose auto, cpu, cuda or cuda:N"
    assert device_name_problem(name) == str(err.value)


def test_the_command_lines_check_and_resolve_device_agree():
    """One rule for both: the command line refuses a name before loading a model with the same line."""
    assert device_dtype_problem("gpu", "auto") == "--device gpu: choose auto, cpu, cuda or cuda:N"
    assert device_dtype_problem("cpu", "float64") == "--dtype float64: choose auto, float32, float16 or bfloat16"
    for name in ("auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"):
        assert device_name_problem(name) is None and device_dtype_problem(name, "auto") is None
    assert str(resolve_device("cpu")) == "cpu"
