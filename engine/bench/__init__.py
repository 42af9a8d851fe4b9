"""`gpt2-engine bench` and its peers: measuring the engine, never imported by the runtime.

- decode: decode tokens/s side by side with transformers (and CTranslate2), the roofline share
- serve: the serving benchmark (`gpt2-engine bench serve`) against any OpenAI-compatible server
- ctranslate2_peer: CTranslate2 as a peer, in a worker process of its own
- launch_count: kernel launches per decode step on the triton backend"""
