"""Running a tuned model: `tunesmith chat` in the terminal (tunesmith.serve.chat) and `tunesmith serve`, an
OpenAI-compatible HTTP API (tunesmith.serve.server), both on the same batched, streaming generation
(tunesmith.serve.generation, tunesmith.serve.engine)."""
