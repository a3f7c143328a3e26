"""Text in, token blocks out. One module per concern, imported by what needs it:

- `documents`: documents read one at a time from files, saved or hub datasets; the held-out split;
- `tokenizer`: byte-level BPE trained on a bounded sample of the training split;
- `tokenize`: tokenizing in worker processes, in order;
- `store`: the token store on disk (shards of uint16/uint32 ids, document offsets, manifest);
- `build`: a store built from the documents, with the statistics of the build;
- `identity`: fingerprints of what a store is built from (settings, input files, tokenizer);
- `blocks`: `seq_len` blocks read from the store's memory maps, and in-memory packing;
- `prepare`: tokenizer and store built once (one process writes, the others wait), reused after;
- `order`: the batch order, a pure function of (step, micro-batch, rank).

This file imports nothing, so tokenizer workers start without torch.
"""
