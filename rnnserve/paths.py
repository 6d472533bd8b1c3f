"""Where the repository keeps data, model folders and archives (overridable by settings)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
MODELS_DIR = REPO_ROOT / "models"
MODEL_STORE = REPO_ROOT / "model_store"

