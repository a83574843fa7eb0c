"""Tests of the methods beyond PCGrad, CAGrad and MGDA: each against a vector-form oracle of its paper."""
