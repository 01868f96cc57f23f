"""Records tests/data/tiny-raw-completion.json from a finished `finetune run` (tests/test_sglang.py reads it):

    .venv/bin/python tests/data/record_raw_completion.py runs/latest

The raw completion is what the tiny model generates, greedily, for the smoke step's first French request, decoded with
its special tokens as a server's detokenizer sees them (the closing <|return|> is the stop token and not part of it),
token by token as a stream carries it; reasoning_content and content are what `transformers serve` returned for the
same request in that run's smoke report.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

run = Path(sys.argv[1])
report = json.loads((run / "smoke" / "report.json").read_text())
request = next(r for r in report["requests"] if r["language"] == "French")
model_dir = Path(report["model_dir"])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
messages = [{"role": "system", "content": f"reasoning language: {request['language']}"},
            {"role": "user", "content": request["prompt"]}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")]
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=report.get("max_tokens", 64), do_sample=False, eos_token_id=stop)
new = [t for t in out[0, ids["input_ids"].shape[-1]:].tolist() if t not in stop]
pieces = [tokenizer.decode([t]) for t in new]
assert "".join(pieces) == tokenizer.decode(new), "a token split a character: stream by larger pieces"
recorded = {"model": "configs/tiny-cpu.yaml after `finetune run` (145 steps)", "language": request["language"],
            "prompt": request["prompt"], "raw": "".join(pieces), "pieces": pieces,
            "reasoning_content": request["reasoning_content"], "content": request["content"]}
path = Path(__file__).with_name("tiny-raw-completion.json")
path.write_text(json.dumps(recorded, ensure_ascii=False, indent=1) + "\n")
print(json.dumps(recorded, ensure_ascii=False)[:600])
