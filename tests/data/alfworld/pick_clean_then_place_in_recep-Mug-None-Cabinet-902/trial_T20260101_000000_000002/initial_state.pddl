;; Hand-written ALFWorld game (same format as ALFWorld's json_2.1.1 initial_state.pddl files):
;; a kitchen corner with a dining table, a sink basin and a cabinet. Task: clean a mug and put it in
;; the cabinet.
(define (problem plan_trial_T20260101_000000_000002)
(:domain alfred)
(:objects
        agent1 - agent
        MugType - otype
        SpoonType - otype
        PotatoType - otype
        DiningTableType - rtype
        SinkBasinType - rtype
        CabinetType - rtype
        Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40 - object
        Spoon_bar__plus_01_dot_95_bar__plus_00_dot_85_bar__minus_00_dot_60 - object
        Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55 - object
        DiningTable_bar__minus_00_dot_70_bar__plus_00_dot_00_bar__plus_01_dot_50 - receptacle
        Sink_bar__plus_01_dot_90_bar__plus_00_dot_90_bar__minus_00_dot_65_bar_SinkBasin - receptacle
        Cabinet_bar__plus_01_dot_20_bar__plus_00_dot_40_bar__minus_01_dot_10 - receptacle
        loc_bar_0_bar_2_bar_1_bar_30 - location
        loc_bar__minus_3_bar_5_bar_0_bar_45 - location
        loc_bar_7_bar__minus_2_bar_1_bar_60 - location
        loc_bar_5_bar__minus_3_bar_2_bar_45 - location
        )

(:init
        (atLocation agent1 loc_bar_0_bar_2_bar_1_bar_30)

        (receptacleType DiningTable_bar__minus_00_dot_70_bar__plus_00_dot_00_bar__plus_01_dot_50 DiningTableType)
        (receptacleType Sink_bar__plus_01_dot_90_bar__plus_00_dot_90_bar__minus_00_dot_65_bar_SinkBasin SinkBasinType)
        (receptacleType Cabinet_bar__plus_01_dot_20_bar__plus_00_dot_40_bar__minus_01_dot_10 CabinetType)
        (objectType Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40 MugType)
        (objectType Spoon_bar__plus_01_dot_95_bar__plus_00_dot_85_bar__minus_00_dot_60 SpoonType)
        (objectType Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55 PotatoType)

        (canContain DiningTableType MugType)
        (canContain DiningTableType SpoonType)
        (canContain DiningTableType PotatoType)
        (canContain SinkBasinType MugType)
        (canContain SinkBasinType SpoonType)
        (canContain SinkBasinType PotatoType)
        (canContain CabinetType MugType)

        (pickupable Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40)
        (pickupable Spoon_bar__plus_01_dot_95_bar__plus_00_dot_85_bar__minus_00_dot_60)
        (pickupable Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55)
        (isReceptacleObject Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40)
        (cleanable Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40)
        (heatable Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40)
        (coolable Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40)
        (cleanable Spoon_bar__plus_01_dot_95_bar__plus_00_dot_85_bar__minus_00_dot_60)
        (cleanable Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55)
        (heatable Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55)
        (coolable Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55)
        (sliceable Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55)

        (openable Cabinet_bar__plus_01_dot_20_bar__plus_00_dot_40_bar__minus_01_dot_10)

        (inReceptacle Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40 DiningTable_bar__minus_00_dot_70_bar__plus_00_dot_00_bar__plus_01_dot_50)
        (inReceptacle Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55 DiningTable_bar__minus_00_dot_70_bar__plus_00_dot_00_bar__plus_01_dot_50)
        (inReceptacle Spoon_bar__plus_01_dot_95_bar__plus_00_dot_85_bar__minus_00_dot_60 Sink_bar__plus_01_dot_90_bar__plus_00_dot_90_bar__minus_00_dot_65_bar_SinkBasin)

        (receptacleAtLocation DiningTable_bar__minus_00_dot_70_bar__plus_00_dot_00_bar__plus_01_dot_50 loc_bar__minus_3_bar_5_bar_0_bar_45)
        (receptacleAtLocation Sink_bar__plus_01_dot_90_bar__plus_00_dot_90_bar__minus_00_dot_65_bar_SinkBasin loc_bar_7_bar__minus_2_bar_1_bar_60)
        (receptacleAtLocation Cabinet_bar__plus_01_dot_20_bar__plus_00_dot_40_bar__minus_01_dot_10 loc_bar_5_bar__minus_3_bar_2_bar_45)
        (objectAtLocation Mug_bar__minus_00_dot_80_bar__plus_00_dot_78_bar__plus_01_dot_40 loc_bar__minus_3_bar_5_bar_0_bar_45)
        (objectAtLocation Potato_bar__minus_00_dot_60_bar__plus_00_dot_80_bar__plus_01_dot_55 loc_bar__minus_3_bar_5_bar_0_bar_45)
        (objectAtLocation Spoon_bar__plus_01_dot_95_bar__plus_00_dot_85_bar__minus_00_dot_60 loc_bar_7_bar__minus_2_bar_1_bar_60)
        )

        (:goal
            (and
                (exists (?r - receptacle)
                    (exists (?o - object)
                        (and
                            (cleanable ?o)
                            (objectType ?o MugType)
                            (receptacleType ?r CabinetType)
                            (isClean ?o)
                            (inReceptacle ?o ?r)
                        )
                    )
                )
            )
        )
    )
