"""Models on the Hugging Face hub (`model: hf:...`), before any weights are fetched: the repo's GGUF files
at the commit a revision resolves to, grouped into models and quants (repo.py), the header of each file
read over HTTP range requests, bounded and cached by repo, commit and file (headers.py), and the plan of a
hub model from those headers, with the largest quant that fits chosen when the reference names none
(planning.py).

The `huggingface_hub` library is the client: its endpoint (`HF_ENDPOINT`), token (`HF_TOKEN`, or the
configured `hub.token_file`), URLs and HTTP session. Importing this package costs nothing; its modules
import the library when they fetch. The planner itself stays pure: it gets the model's shape."""
