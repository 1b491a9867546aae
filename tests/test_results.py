"""The README results table: a store without the runs behind some lines keeps them."""
from __future__ import annotations

from mnist_opt.reporting import results

ROW = {"study": "mlp_tpe", "dataset": "mnist", "model": "mlp", "sampler": "tpe",
       "pruner": "hyperband", "complete": 17, "pruned": 13, "search_s": 504.0,
       "retrain_s": 186.0, "epochs": 12.0, "seeds": 3, "val": 0.9823, "baseline": 0.9796,
       "test": 0.9836, "std": 0.0002, "reference": 0.959, "source": "a notebook"}


def test_lines_without_runs_in_this_store_are_kept_and_unknown_studies_dropped(tmp_path):
    old = results.markdown([ROW, {**ROW, "study": "cnn_gp", "test": 0.9959},
                            {**ROW, "study": "gone", "test": 0.5}])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.START}\n{old}{results.END}\nend\n")
    fresh = {**ROW, "test": 0.9849, "std": 0.0012}
    known = ["cnn_gp", "mlp_tpe"]
    kept = results.kept_lines(readme, {"mlp_tpe"}, known)
    assert list(kept) == ["cnn_gp"] and "99.59%" in kept["cnn_gp"]
    results.update_file(readme, results.markdown([fresh], kept, known))
    text = readme.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split("|")[1].strip() for line in lines] == ["study", "cnn_gp", "mlp_tpe"]
    assert "98.49% ± 0.12%" in text and "98.36%" not in text and "gone" not in text
    assert text.startswith("intro\n") and text.endswith("end\n")
