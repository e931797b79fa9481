"""The entry point: which job a command line runs, read before absl parses it."""

from cca_jax import main


def test_peek_job_reads_the_override_or_the_recipe(tmp_path):
    assert main._peek_job(["--config=configs/var_d16.py", "--workdir=w"]) == "train"
    assert main._peek_job(["--config", "configs/demo.py"]) == "demo"
    assert main._peek_job(["--config=configs/var_d16.py", "--config.job=sample"]) == "sample"
    recipe = tmp_path / "recipe.py"
    recipe.write_text("import ml_collections\n"
                      "def get_config(arg='eval'):\n"
                      "    return ml_collections.ConfigDict({'job': arg})\n")
    assert main._peek_job([f"--config={recipe}"]) == "eval"
    assert main._peek_job([f"--config={recipe}:plan"]) == "plan"  # config_flags' file:arg form
    assert main._peek_job(["--config=missing.py"]) == ""  # absl reports it, not the peek
    assert main._peek_job([]) == ""
    assert main.KEEP_HOST_MEMORY_JOBS == ("train",)
