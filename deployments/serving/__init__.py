"""One module per endpoint family: an OpenAI request in, engine requests out, chunks back as OpenAI responses."""
