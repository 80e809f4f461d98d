"""Runs on dict inputs (token ids: Hugging Face models) fold from the CLI: the run keeps its
example input (example.pt, checksummed, weights_only), which `easier fold` captures on."""

import hashlib
import json
import pickle
import sys
import textwrap

import pytest
import torch

from easier.cli import main
from easier.io.artifacts import load_folded
from easier.io.records import load_model

BERT = textwrap.dedent('''
    import torch, transformers
    from torch.utils.data import Dataset

    def build(num_classes):
        cfg = transformers.BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=32,
                                      num_labels=num_classes)
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(cfg)

    class Tokens(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(5, 200, (n, 8), generator=g)
            self.y = (self.ids[:, 0] > 100).long()
        def __len__(self): return len(self.ids)
        def __getitem__(self, i): return {"input_ids": self.ids[i], "labels": self.y[i]}

    def splits(seed):
        return Tokens(64, seed), Tokens(32, seed + 1000)
''')


@pytest.fixture
def bert_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    code = tmp_path / "code"
    code.mkdir()
    (code / "tiny_bert.py").write_text(BERT)
    monkeypatch.setattr("sys.path", list(sys.path))
    monkeypatch.chdir(code)
    out = tmp_path / "run"
    rc = main(["reduce", "--model", "tiny_bert.py:build", "--data", "tiny_bert.py:splits",
               "--pretrain-epochs", "0", "--max-steps", "1", "--max-removals", "1",
               "--delta", "100", "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    return out, code


def _build(code):
    sys.path.insert(0, str(code))
    try:
        import tiny_bert
    finally:
        sys.path.remove(str(code))
    return tiny_bert


@pytest.mark.slow
def test_reduce_on_token_data_folds_and_the_program_matches(bert_run):
    out, code = bert_run
    assert json.loads((out / "config.json").read_text())["input_shape"] is None
    example = torch.load(out / "example.pt", weights_only=True)
    assert set(example) == {"input_ids"} and example["input_ids"].shape == (2, 8)
    tb = _build(code)
    # the example is the val set's first two items, as the data gives them
    val = tb.splits(0)[1]
    assert torch.equal(example["input_ids"], torch.stack([val[0]["input_ids"],
                                                          val[1]["input_ids"]]))
    kept = load_model(out / "model.pt", tb.build(2)).eval()
    folded = load_folded(out)
    ids = torch.randint(5, 200, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = kept(input_ids=ids).logits
        got = folded(input_ids=ids)
    got = got["logits"] if isinstance(got, dict) else getattr(got, "logits", got)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # `easier fold` again from the directory alone (the code named on the command line)
    assert main(["fold", str(out), "--plan", "all", "--model",
                 f"{code / 'tiny_bert.py'}:build"]) == 0
    assert (out / "fold_plan.json").is_file()


@pytest.mark.slow
def test_a_changed_or_planted_example_is_refused(bert_run, capsys):
    out, code = bert_run
    spec = ["--model", f"{code / 'tiny_bert.py'}:build"]
    path = out / "example.pt"
    # bit rot: the recorded sha256 no longer matches
    good = path.read_bytes()
    path.write_bytes(good[:-5] + bytes(5))
    capsys.readouterr()
    assert main(["fold", str(out), *spec]) == 1
    err = capsys.readouterr().err
    assert "example.pt" in err and "Traceback" not in err
    # a pickle that runs code, with its digest recorded as if easier had written it
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = pickle.dumps({"input_ids": Evil()})
    path.write_bytes(evil)
    sums = json.loads((out / "checksums.json").read_text())
    sums["files"]["example.pt"] = [hashlib.sha256(evil).hexdigest()]
    (out / "checksums.json").write_text(json.dumps(sums))
    assert main(["fold", str(out), *spec]) == 1
    cap = capsys.readouterr()
    assert "pwned" not in cap.out and "example.pt" in cap.err and "Traceback" not in cap.err
