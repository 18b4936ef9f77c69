"""The local demo, ``python -m sidecar.demo``: sample servers, the sidecar in standalone
mode and load, all on 127.0.0.1 (cpu: the default scenario; llm: the LLM scenario;
llmsim: the stand-in LLM server)."""
