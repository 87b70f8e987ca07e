"""Write the tiny CLIP BPE tokenizer shipped in dreambooth/assets/tokenizer (run once; output is committed).

Same layout as OpenAI CLIP's vocabulary, only far smaller: 256 byte symbols, the same 256 with the
end-of-word marker `</w>`, tokens from a few merges of common prompt words, then the two special tokens.
Usage: python scripts/make_tiny_tokenizer.py [OUT_DIR]
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dreambooth" / "assets" / "tokenizer"

# Words whose merges we add so common prompts tokenise to a few ids (optional; any text still works
# byte by byte). Chosen from DreamBooth prompts; "sks" is the customary rare identifier.
WORDS = (
    "a an the of in on with and photo picture image sks dog cat person man woman face portrait "
    "style painting drawing high quality detailed"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build() -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) in CLIP's order: bytes, bytes+</w>, merged tokens, specials last."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in WORDS:
        # Merge left to right: "dog" -> "d o", "do g</w>"; prefixes shared between words are reused.
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in merges:
                merges.append(pair)
                tokens.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    # Specials go last, as in CLIP, so <|endoftext|> has the largest id (CLIPTextModel's legacy pooling
    # takes argmax(input_ids) as the end-of-text position).
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write(out: Path = OUT) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `out`."""
    vocab, merges = build()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    # transformers 4's slow CLIPTokenizer skips the first line unconditionally: keep CLIP's header.
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # as in SD 2.1 base (SD 1.x pads with "!")
        "unk_token": "<|endoftext|>",
    }
    config = {
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
