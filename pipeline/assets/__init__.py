from pipeline.assets.backtest import backtest
from pipeline.assets.base_model import base_model
from pipeline.assets.features import features
from pipeline.assets.hyperparameters import hyperparameters
from pipeline.assets.prediction_performance import prediction_performance
from pipeline.assets.predictions import predictions
from pipeline.assets.prompt_corpus import prompt_corpus
from pipeline.assets.raw_market_data import raw_market_data
from pipeline.assets.regressor import regressor
from pipeline.assets.training_set import training_set
from pipeline.assets.universe import universe

ALL_ASSETS = [
    raw_market_data,
    universe,
    features,
    training_set,
    base_model,
    prompt_corpus,
    hyperparameters,
    regressor,
    predictions,
    prediction_performance,
    backtest,
]
