"""`compressor`: a command-line client of the compression service's REST API (requests, tqdm and the standard
library only: it never imports Django, torch or the engine, so it runs on any machine that can reach the server)."""
