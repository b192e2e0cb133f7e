"""Python reference for `cargo xtask bench data`: Megatron-LM's `tools/preprocess_data.py` flow
with megatron-core's own pieces — a `multiprocessing.Pool(workers)` mapping `Encoder.encode` over
the JSON lines (`imap`, chunks of 32), each worker holding megatron-core's
`HuggingFaceTokenizer` (transformers' AutoTokenizer over the tokenizer.json; no special tokens;
EOD = EOS), the main process writing with `IndexedDatasetBuilder`
(`{prefix}_{key}_document.bin/.idx`, `DType.optimal_dtype`). Prints one line:

    reference: docs=N tokens=T seconds=S

`train CORPUS OUT_DIR VOCAB` trains the bench's byte-level BPE tokenizer.json (GPT-2 / Qwen
style) on the corpus's first lines and writes its tokenizer_config.json.
"""

import argparse
import json
import multiprocessing
import sys
import time


class Encoder:
    def __init__(self, tok_dir, keys, append_eod):
        self.tok_dir, self.keys, self.append_eod = tok_dir, keys, append_eod

    def initializer(self):
        from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer
        Encoder.tokenizer = HuggingFaceTokenizer(self.tok_dir)

    def encode(self, line):
        data = json.loads(line)
        ids, lens = {}, {}
        for key in self.keys:
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids, sentence_lens = [], []
            for s in sentences:
                t = Encoder.tokenizer.text_to_ids(s)
                if len(t) > 0:
                    doc_ids.extend(t)
                    sentence_lens.append(len(t))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(Encoder.tokenizer.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(line)


def run(a):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import HuggingFaceTokenizer

    start = time.time()
    vocab = HuggingFaceTokenizer(a.tokenizer).vocab_size
    builders = {k: IndexedDatasetBuilder(f"{a.output_prefix}_{k}_document.bin", dtype=DType.optimal_dtype(vocab))
                for k in a.json_keys}
    enc = Encoder(a.tokenizer, a.json_keys, a.append_eod)
    docs = tokens = 0
    with open(a.input, encoding="utf-8") as fin, multiprocessing.Pool(a.workers, initializer=enc.initializer) as pool:
        for doc, lens, _ in pool.imap(enc.encode, fin, 32):
            docs += 1
            for k in doc:
                builders[k].add_document(doc[k], lens[k])
                tokens += len(doc[k])
    for k, b in builders.items():
        b.finalize(f"{a.output_prefix}_{k}_document.idx")
    print(f"reference: docs={docs} tokens={tokens} seconds={time.time() - start:.3f}")


def train(corpus, out, vocab):
    import os

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    lines = []
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 2000:
                break
            lines.append(json.loads(line)["text"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    os.makedirs(out, exist_ok=True)
    tok.save(f"{out}/tokenizer.json")
    with open(f"{out}/tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "model_max_length": 1 << 30}, f)


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--output-prefix", required=True)
    run(p.parse_args())
