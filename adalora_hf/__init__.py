"""adalora_hf: the PEFT-compatible AdaLoraConfig / AdaLoraModel bridge for transformers.

Migrating from PEFT is an import change::

    from adalora_hf import AdaLoraConfig, AdaLoraModel, get_peft_model  # was: from peft import ...

Adapters are saved in PEFT's file format (``adapter_config.json`` + ``adapter_model.safetensors``)
and load in either library. ``AdaLoraCallback`` runs the rank allocation in
``transformers.Trainer``.
"""

from ._arrays import save_adapter_arrays as save_adapter_arrays
from ._callback import AdaLoraCallback as AdaLoraCallback
from ._config import AdaLoraConfig as AdaLoraConfig
from ._kbit import prepare_model_for_kbit_training as prepare_model_for_kbit_training
from ._loftq_config import LoftQConfig as LoftQConfig
from ._model import AdaLoraModel as AdaLoraModel
from ._modules_to_save import ModulesToSaveWrapper as ModulesToSaveWrapper
from ._peft_model import AdaLoraPeftModel as AdaLoraPeftModel
from ._peft_model import PeftModel as PeftModel
from ._peft_model import get_peft_model as get_peft_model
from ._peft_types import PeftConfig as PeftConfig
from ._peft_types import PeftType as PeftType
from ._peft_types import TaskType as TaskType
from ._state_dicts import get_base_model_state_dict as get_base_model_state_dict
from ._state_dicts import get_peft_model_state_dict as get_peft_model_state_dict
from ._state_dicts import set_base_model_state_dict as set_base_model_state_dict
from ._state_dicts import set_peft_model_state_dict as set_peft_model_state_dict
from ._status import TunerLayerStatus as TunerLayerStatus
from ._status import TunerModelStatus as TunerModelStatus
from ._status import get_layer_status as get_layer_status
from ._status import get_model_status as get_model_status
from ._targets import DEFAULT_TARGET_MODULES as DEFAULT_TARGET_MODULES
from ._targets import default_target_modules as default_target_modules

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdaLoraPeftModel",
    "LoftQConfig",
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "default_target_modules",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "prepare_model_for_kbit_training",
    "save_adapter_arrays",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
]
