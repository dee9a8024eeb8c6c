"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    commands = [line for line in lines[:6] if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert commands[0].endswith("jaxattr demo")
    assert commands[1].endswith("python -m pytest -q")


def test_readme_examples_run_in_order(capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    sketch = namespace["in_training_sketch"]
    assert sketch.num_train == 150
    assert "(50, 150)" in capsys.readouterr().out
