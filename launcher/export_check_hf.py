"""The transformers side of the export self-check (launcher/export_check.py).

    python -I -S export_check_hf.py JOB.json SITE_DIR [SITE_DIR ...]

Run by the exporting process in a fresh interpreter that sees what a user of the export sees:
the standard library, the given site-packages directories (appended by hand, so no ``.pth``
file runs and an editable install of plait stays invisible) and nothing of plait. A finder at
the front of ``sys.meta_path`` also refuses ``plait`` outright, so the check holds where
plait is installed into the same site-packages as transformers (a non-editable install): if
the shipped modeling code imported plait, loading would fail here as it would for a user.

JOB.json names the export directory, the token ids, the prompt length, the number of new
tokens, the texts whose encodings are compared and the output file. This loads the
directory with ``AutoModelForCausalLM`` (trust_remote_code, float32 whatever dtype the
weights were written in) and saves with ``torch.save``: the logits of one forward over the
tokens, one cached greedy ``generate()`` after the prompt (eos disabled: plait's greedy
decode never stops) with the logits of each of its steps, the texts encoded by
``AutoTokenizer``, and the versions of transformers and torch. It imports nothing of plait.
"""

import importlib.abc
import json
import sys


class _NoPlait(importlib.abc.MetaPathFinder):
    """Refuses every ``plait`` import: the export must load without plait installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "plait" or name.startswith("plait."):
            raise ModuleNotFoundError(f"No module named {name!r} (the export check hides plait)")
        return None


def main() -> None:
    job_file, sites = sys.argv[1], sys.argv[2:]
    sys.meta_path.insert(0, _NoPlait())
    sys.path.extend(sites)
    try:
        import plait  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("export check: plait is importable in the checking process")
    assert "plait" not in sys.modules, "plait is importable"

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(job_file) as f:
        job = json.load(f)
    directory = job["directory"]
    # trust_remote_code: without it AutoTokenizer asks on stdin whether to run the auto_map
    # code that config.json names (the tokenizer itself is plain tokenizer.json)
    # A native export (a class transformers ships) loads without remote code, as its users
    # load it: job["remote_code"] is false for those.
    remote = job.get("remote_code", True)
    tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=remote)
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in job["texts"]]
    model = AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=remote, dtype=torch.float32
    )
    model.eval()
    model.generation_config.eos_token_id = None  # compared with plait's greedy, which never stops
    ids = torch.tensor([job["tokens"]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        prompt = ids[:, : job["prompt"]]
        gen = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=job["new"],
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    out = {
        "logits": logits,
        "greedy": gen.sequences[0, job["prompt"] :],
        "step_logits": torch.cat([s.float() for s in gen.logits], 0),
        "encoded": encoded,
        "transformers": str(transformers.__version__),
        "torch": str(torch.__version__),
    }
    torch.save(out, job["out"])


if __name__ == "__main__":
    main()
