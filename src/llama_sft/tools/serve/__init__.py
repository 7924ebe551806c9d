"""``llama-sft serve``: an OpenAI-compatible HTTP API and a web chat page for a trained model.

Contract: ``--model DIR`` (merged or fully fine-tuned) or ``--base_model DIR --lora_model DIR [DIR ...]``
(LoRAs merged in the order given), loaded, and with the tokenizer and template found, as ``chat``
does. Prompts are rendered by ``templates.prompt_ids``, the renderer of training and ``chat``, so
at temperature 0 an answer is the one ``llama-sft chat --do_sample false`` gives.

* ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (OpenAI request and
  response shapes, ``stream`` as server-sent events ending in ``data: [DONE]``), ``GET /health``,
  and the chat page at ``/``.
* Concurrent requests are decoded together by ``Engine``: one thread owns the model; every step it
  admits waiting requests (each prefilled alone, its KV cache joined to the batch's, left-padded)
  and decodes one token for every running request. A finished, failed or disconnected request
  leaves the batch before the next step. docs/serving.md says why this is not transformers'
  continuous batching.
* An answer ends, with ``finish_reason`` ``"stop"``, at EOS or at the template's end-of-turn token
  (chatml's ``<|im_end|>``, llama3's ``<|eot_id|>``): ``Template.stop_ids``, as in ``chat``; on both
  endpoints, streamed or not. Neither token is part of the text.
* Bad requests get ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; with
  ``--api_key`` every ``/v1`` request needs ``Authorization: Bearer KEY``. A host other than loopback
  is refused without ``--api_key`` unless ``--allow_no_auth`` is given.

Modules: ``engine`` (the batch and sampling), ``protocol`` (request validation, prompts and response
shapes), ``app`` (the FastAPI routes, API key and chat page, whose HTML is ``page``), ``command`` (the
flags, loading the model, ``main``).
"""

from .app import create_app
from .command import ServeError, main, prepare

__all__ = ["ServeError", "create_app", "main", "prepare"]
