from roberta_ds.data.masking import IGNORE_INDEX  # the data side owns it; re-exported for users
from roberta_ds.model.hf import load_hf, save_hf, save_hf_state_dict
from roberta_ds.model.roberta import MLMOutput, RobertaMLM

__all__ = ["IGNORE_INDEX", "MLMOutput", "RobertaMLM", "load_hf", "save_hf", "save_hf_state_dict"]
