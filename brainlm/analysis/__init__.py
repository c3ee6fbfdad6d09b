"""What a trained model says about brains: `embeddings` (CLS and mean per recording),
`networks` (parcels clustered from representations vs raw FC), `reconstruction` (whole
recordings from rotating masks), `perturbation` (in-silico edits), `yardstick` (linear probe and
network ARI, the same for every run), `mask_ratios` (runs compared on that yardstick) and `cli`
(the analyze and perturb commands)."""
