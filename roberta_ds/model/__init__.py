from roberta_ds.model.hf import load_hf, save_hf, save_hf_state_dict
from roberta_ds.model.roberta import IGNORE_INDEX, MLMOutput, RobertaMLM

__all__ = ["IGNORE_INDEX", "MLMOutput", "RobertaMLM", "load_hf", "save_hf", "save_hf_state_dict"]
