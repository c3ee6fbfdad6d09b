"""Data layer: `ingest` (find recordings and phenotypes), `parcellate` (4-D NIfTI -> [parcels,
time]), `pipeline` (the preprocessing run), `split` (by subject), `scale` (robust scaler fitted on
training subjects), `store` (the on-disk store and its windows), `windows` (targets and window
batches for fine-tuning and evaluation), `validate` (Great Expectations), `synthetic` (cohorts
with known structure)."""
