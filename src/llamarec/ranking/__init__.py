"""LLM ranking stage of LlamaRec.

:mod:`~llamarec.ranking.prompt` turns a user's history and the retrieved candidates into one
prompt whose candidates carry the index letters A..T; :mod:`~llamarec.ranking.verbalizer` reads
the LLM's next-token logits of those letters after the prompt as ranking scores (one forward
pass, no generation); :mod:`~llamarec.ranking.llm` loads the causal LM and its tokenizer.
"""
