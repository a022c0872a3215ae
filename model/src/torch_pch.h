// Precompiled header for the engine: the LibTorch headers every engine file needs.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/functional/activation.h>
#include <torch/serialize.h>
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
