from .config import PromptInit, PromptTuningConfig, TaskType
from .errors import SoftpromptError
from .models import PromptModel, get_prompt_model
