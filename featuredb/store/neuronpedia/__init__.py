"""Export a catalogue in Neuronpedia's dataset format, and import such an export.

Layout (as Neuronpedia publishes its datasets, one folder per source):

    OUT/{modelId}/{sourceId}/model.jsonl, release.jsonl, sourceset.jsonl, source.jsonl
    OUT/{modelId}/{sourceId}/features|activations|explanations/batch-N.jsonl.gz
    OUT/{modelId}/{sourceId}/featuredb/...            (our sidecar, see below)

A coder (`coders` row) is a source `{layer}-{sourceSetName}`; the set name is derived from the
coder_id without its layer part (`smollm2-res-L15-w4096-k32` -> `smollm2-res-w4096-k32`), the model
id from the model name (`google/gemma-2-2b` -> `gemma-2-2b`); both can be overridden. Batch N of
each kind holds the rows of the same `batch_size` features (1024, as Neuronpedia's exports).

Sidecar: everything we store that Neuronpedia has no field for (the coders row; per feature
active_count, mean/std, hist_max, logit token ids, top tokens, the description columns and their
embedding; per example rank, token_ids, doc_id, context_index; per description method, source,
prompt version, time and scores) is written to `featuredb/` beside the Neuronpedia files, in
gzipped JSONL batches mirroring theirs and keyed like them (`layer`, `index`, `id`), so their rows
hold only their own field names and export -> import restores every row exactly.

What goes where:
- format.py: the format both directions share: folder and file names, Neuronpedia's field
  names, our sidecar fields, model / source ids and row ids.
- jsonl.py: writing and reading (gzipped) JSONL files and batch folders; `Line`, one input row
  with typed getters whose errors name the file and line.
- export.py: `export_neuronpedia`, with the field mapping ours -> Neuronpedia.
- load.py: `import_neuronpedia` (finding sources, writing them), with the defaults for a real
  Neuronpedia export (no sidecar) and the safety rules.
- read_source.py: reading and validating one source folder (and its sidecar) into our rows.
- progress.py: the marker of an import in progress, by which running a killed import again
  finishes it (with the tables of an uninterrupted import).
- fast_activations.py, columnar.py: the fast path of import for activations batch files (the bulk
  of a source), read column-wise by Arrow's JSON reader with vectorised checks; any file it does
  not plainly accept is read line by line by read_source.py, so results and errors are the same.
- export_activations.py: the activation rows of an export, built column-wise with polars.
- defaults.py: the columns a source without a sidecar lacks, filled in from what it has.
"""

from featuredb.store.neuronpedia.export import ExportResult, export_neuronpedia
from featuredb.store.neuronpedia.format import DEFAULT_BATCH_SIZE, model_id_for, source_set_for
from featuredb.store.neuronpedia.load import ImportResult, import_neuronpedia

__all__ = ["DEFAULT_BATCH_SIZE", "ExportResult", "ImportResult", "export_neuronpedia", "import_neuronpedia",
           "model_id_for", "source_set_for"]
