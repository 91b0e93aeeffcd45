from pipeline.assets.features import features
from pipeline.assets.raw_market_data import raw_market_data
from pipeline.assets.universe import universe

ALL_ASSETS = [raw_market_data, universe, features]
