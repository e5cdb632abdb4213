"""``deltatune serve``: an OpenAI-compatible HTTP server for one base model and many LoRA adapters.

    HTTP (FastAPI on uvicorn)   app.py          routes, API key, OpenAI-shaped errors
      requests -> rows          completions.py  chat template, sampling, incremental text (text.py), SSE
      the serving scheduler     scheduler.py    one engine thread: continuous batching, rows of many adapters
      names -> adapter folders  adapters.py     the registry, run-time loading under --adapter-root
    options.py (flags, checked before torch loads), protocol.py (the wire format), server.py (assembly)

A request's ``model`` names an adapter or the base; rows of different adapters decode in the same forward
(the LoRA layers group a batch's rows by adapter). See docs/serving.md.
"""
