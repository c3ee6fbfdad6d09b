"""Training: `config` (the settings of pretraining and fine-tuning), `pretrain` (build a run,
then the MAE step loop), `reconstruction` (masks, R^2 and the baselines a pretrained model must
beat), `scoring` (the run scored on those baselines and by its frozen encoder), `model_card`
(the folder a finished run leaves), `finetune` (probe, full, forecast; one early-stopping loop)
and `hpo` (Optuna over fine-tuning, shared storage)."""
