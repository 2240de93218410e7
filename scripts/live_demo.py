"""The end of ``scripts/setup-and-run.sh``: the patched SGLang serving for real.

Starts ``python -m sglang.launch_server`` from the patched tree on SGLang's CPU engine with the
demo model and ``--enable-kvtuner-hicache``, sends a long prompt, pushes it out of the device
pool with other prompts, sends it again, and prints where its tokens came from and what the
quantized host pool stores per token against SGLang's stock pool. The server is stopped at
the end, also on failure.

usage: python scripts/live_demo.py PATCHED_TREE [extra launch_server flags...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "live"))

from server import (  # noqa: E402
    LiveServer,
    kjv_documents,
    model_dir,
    pool_bytes_per_token,
    pool_startup_line,
)

# A device pool smaller than the prompt plus the prompts sent after it.
DEMO_ARGS = ("--max-total-tokens", "3072", "--hicache-ratio", "2", "--enable-kvtuner-hicache")


def main(tree: str, extra: list) -> int:
    model = model_dir()
    prompt, *others = kjv_documents()[:4]
    log = Path(tempfile.mkdtemp(prefix="kvtuner-demo-")) / "server.log"
    print(f"model: {model}\nserver log: {log}")
    print("starting the patched server on the CPU engine (~1 min) ...", flush=True)
    with LiveServer(sys.executable, tree, model, [*DEMO_ARGS, *extra], log) as srv:
        line = pool_startup_line(srv.log()) or "(no pool line: is the tree patched?)"
        print(f"  {line}")
        cold = srv.generate(prompt)
        print(
            f"cold:  {cold.prompt_tokens} prompt tokens, {cold.cached_tokens} cached, "
            f"{cold.seconds:.2f} s -> {cold.text!r}"
        )
        pushed = sum(srv.generate(doc, max_new_tokens=1).prompt_tokens for doc in others)
        print(
            f"pushed out of the {DEMO_ARGS[1]}-token device pool by {len(others)} other "
            f"prompts ({pushed} tokens)"
        )
        again = srv.generate(prompt)
        print(
            f"again: {again.prompt_tokens} prompt tokens: {again.host} from the quantized "
            f"host pool, {again.device} from the device pool, {again.storage} from storage, "
            f"{again.seconds:.2f} s -> {again.text!r}"
        )
        if again.text == cold.text:
            print("greedy continuation: the cold run's")
        else:
            print(
                "greedy continuation: not the cold run's (4-bit pages change some next tokens "
                "of this 135M model; see the README's accuracy table, or try K8V8)"
            )
        sizes = pool_bytes_per_token(srv.log())
        if sizes:
            ours, stock = sizes
            print(
                f"host pool: {ours} B/token against the stock pool's {stock} B/token: "
                f"{stock / ours:.2f}x the tokens in the same --hicache-size"
            )
        problems = srv.tracebacks()
    if again.host == 0:
        print("demo: the prompt did not come back from the host pool", file=sys.stderr)
        return 1
    if problems:
        print(f"demo: the server log has a traceback: {log}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    sys.exit(main(sys.argv[1], sys.argv[2:]))
