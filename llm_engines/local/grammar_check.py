"""Whether llama.cpp can build a sampling grammar from a JSON schema, found out in a process of its own.

llama.cpp does not fail cleanly on every schema: some (an empty ``enum``, a ``maxItems`` or a regex
repetition in the tens of thousands) make it return no grammar or crash the process that tries. The
llama_cpp engine's ``check_schema`` runs this module as a child process, so that a schema from
outside (the OpenAI-compatible API's ``response_format``) is refused with a clear error instead of
taking a server process down.

    python -m llm_engines.local.grammar_check MODEL.gguf < schema.json   # exit 0: usable
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from llama_cpp import Llama, LlamaGrammar
    from llama_cpp import llama_cpp as native

    schema = json.load(sys.stdin)
    llama = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    sampler = native.llama_sampler_init_grammar(llama._model.vocab, grammar._grammar.encode(), grammar._root.encode())
    if not sampler:
        print("llama.cpp could not build a grammar from the schema", file=sys.stderr)
        return 1
    native.llama_sampler_free(sampler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
